"""Methods as plugins: a package registers a ``Learner`` subclass in the ``spacenet_np.methods`` entry-point group.

In the plugin's ``pyproject.toml``::

    [project.entry-points."spacenet_np.methods"]
    l2_finetune = "spacenet_l2:L2FineTune"

Once the package is installed, the method is in ``methods.METHODS``, so ``--method l2_finetune``, its declared
options (``OPTIONS``, one ``--flag`` each), the sweep and checkpoints know it, with no edit to spacenet_np (see
``examples/l2_plugin``). The entry point's name is the method's name and must equal the class's ``name``
attribute, which checkpoints record.

Discovery runs at the first use of ``METHODS``, never at ``import spacenet_np``. A plugin that cannot be used (it
fails to import, is not a Learner, shadows a built-in or another plugin's method, or declares an option that
clashes with a config field, a command-line argument or another method's option of the same name) is left out
with a ``PluginWarning`` naming the entry point, its package and the reason.
"""
import importlib.metadata
import re
import warnings

from .options import Option, config_options
from .spacenet import SpaceNetConfig
from .strategy import Learner

GROUP = "spacenet_np.methods"
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # the name goes into run folder names and --method
# The arguments of the train CLI that are not declared options: an option of the same name would clash with them.
RESERVED_NAMES = frozenset({
    "help", "task", "method", "preset", "seeds", "arch", "width", "hidden", "validation", "workers", "threads",
    "checkpoint_every", "resume", "overwrite", "data_dir", "out", "quiet", "classes_per_task", "class_order",
    "scheduler"})


class PluginWarning(UserWarning):
    """A plugin method that was left out, and why."""


def discover(builtins, entry_points=None):
    """The usable plugin methods of the entry-point group (or of ``entry_points``, EntryPoint objects) next to
    ``builtins`` (name -> class). Returns ({name: class}, {name: reason}) for the accepted and the refused ones;
    warns once per refused plugin."""
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=GROUP)
    entry_points = sorted(entry_points, key=lambda ep: (ep.name, ep.value))
    names = [ep.name for ep in entry_points]
    accepted, refused = {}, {}
    for ep in entry_points:
        try:
            if names.count(ep.name) > 1:
                others = [describe(other) for other in entry_points if other.name == ep.name and other is not ep]
                raise PluginProblem(f"another plugin registers the same name: {', '.join(others)}")
            accepted[ep.name] = check_method(ep.name, load(ep), {**builtins, **accepted})
        except PluginProblem as problem:
            refused[ep.name] = f"{describe(ep)}: {problem}"
            warnings.warn(f"spacenet_np: plugin method left out: {refused[ep.name]}", PluginWarning, stacklevel=3)
    return accepted, refused


class PluginProblem(Exception):
    """Why one plugin cannot be used (caught in ``discover``)."""


def describe(ep):
    """'name = module:attr (package dist-1.0)' for messages."""
    dist = getattr(ep, "dist", None)
    package = f" (package {dist.name} {dist.version})" if dist is not None else ""
    return f"{ep.name} = {ep.value}{package}"


def load(ep):
    """The object the entry point names; PluginProblem with the error if importing it fails."""
    try:
        return ep.load()
    except Exception as err:  # any error of third-party code at import: the plugin is left out, never fatal
        raise PluginProblem(f"import failed: {type(err).__name__}: {err}") from None


def check_method(name, cls, known):
    """``cls`` if it can be the method ``name`` next to ``known`` (name -> class); PluginProblem otherwise."""
    if not NAME_PATTERN.fullmatch(name):
        raise PluginProblem(f"the name must be letters, digits and _ (starting with a letter), got {name!r}")
    if name in known:
        raise PluginProblem(f"method {name!r} exists already ({known[name].__module__}.{known[name].__qualname__})")
    if not (isinstance(cls, type) and issubclass(cls, Learner)):
        raise PluginProblem(f"{cls!r} is not a subclass of spacenet_np.strategy.Learner")
    if getattr(cls, "name", None) != name:
        raise PluginProblem(f"{cls.__qualname__}.name is {getattr(cls, 'name', None)!r}; it must be the entry "
                            f"point's name {name!r}, which checkpoints record")
    check_options(cls, known)
    return cls


def check_options(cls, known):
    """PluginProblem for an ``OPTIONS`` entry that is not an ``Option``, has an invalid default, or clashes with
    a config field, a CLI argument, or another method's different option of the same name or flag."""
    options = getattr(cls, "OPTIONS", ())
    if not isinstance(options, tuple) or not all(isinstance(option, Option) for option in options):
        raise PluginProblem(f"{cls.__qualname__}.OPTIONS must be a tuple of spacenet_np.options.Option")
    taken = {}  # name or flag -> (what holds it, its declaration or None when no declaration may share it)
    for o in config_options(SpaceNetConfig).values():
        taken[o.name] = taken[o.flag] = (f"the config field {o.name!r}", None)
    for n in RESERVED_NAMES:
        flag = "--" + n.replace("_", "-")
        taken[n] = taken[flag] = (f"the command-line argument {flag}", None)
    for method, other in known.items():
        for o in getattr(other, "OPTIONS", ()):
            holder = (f"the option {o.name!r} ({o.flag}) of method {method!r}, declared differently", o)
            taken.setdefault(o.name, holder)
            taken.setdefault(o.flag, holder)
    seen = set()
    for option in options:
        if option.name in seen:
            raise PluginProblem(f"option {option.name!r} is declared twice")
        seen.add(option.name)
        for key in (option.name, option.flag):
            owner, declared = taken.get(key, (None, None))
            if owner is not None and declared != option:  # the same declaration may be shared (e.g. total_tasks)
                raise PluginProblem(f"option {option.name!r} ({option.flag}) clashes with {owner}")
        try:
            option.check(option.default)
        except ValueError as err:
            raise PluginProblem(f"option {option.name!r} has an invalid default: {err}") from None
