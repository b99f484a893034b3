"""Methods as plugins: the real package tests/plugin_pkg, installed with pip, registers "decay_finetune" through the
``spacenet_np.methods`` entry-point group; discovery is not mocked.

pip installs the package into a temporary folder (``--target``), not into the environment: other test runs
sharing the environment never see it, and nothing needs uninstalling. The folder goes on ``sys.path`` (and on
``PYTHONPATH`` for subprocesses), which is how an installed package is found; ``METHODS.reload()`` discovers it.
"""
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import interrupt_after, make_blobs, results_without_time, tiny_config

from spacenet_np import checkpoint, plugins, sweep, train
from spacenet_np.methods import METHODS, FineTune
from spacenet_np.network import SparseMLP
from spacenet_np.options import Option

TESTS = Path(__file__).parent
PLUGIN_SOURCE = TESTS / "plugin_pkg"
EXAMPLE = TESTS.parent / "examples" / "l2_plugin"
PLUGIN = "decay_finetune"
ARGS = ["--hidden", "20", "--connections", "40", "30", "--selected", "8", "--reserved", "2", "--epochs", "2",
        "--batch-size", "16", "--quiet", "--method", PLUGIN, "--decay", "0.25"]


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory):
    """A folder holding the plugin package as pip installs it (dist-info with entry_points.txt)."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN_SOURCE, root / "src")  # pip builds in the source tree: keep tests/ clean
    site = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                           str(source)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"pip could not install {PLUGIN_SOURCE}:\n{done.stdout}\n{done.stderr}")
    return site


@pytest.fixture
def installed(plugin_site):
    """The plugin importable and discovered in this process; removed again afterwards."""
    sys.path.insert(0, str(plugin_site))
    importlib.invalidate_caches()
    METHODS.reload()
    yield plugin_site
    sys.path.remove(str(plugin_site))
    sys.modules.pop("spacenet_np_testplugin", None)
    importlib.invalidate_caches()
    METHODS.reload()


@pytest.fixture(scope="module")
def npz_task(tmp_path_factory):
    """npz:PATH of 4 classes of blobs (16 features, uint8): 2 tasks of 2 classes."""
    x_train, y_train = make_blobs(4, 16, 30, seed=0)
    x_test, y_test = make_blobs(4, 16, 10, seed=1, centre_seed=0)
    path = tmp_path_factory.mktemp("npz") / "blobs.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def test_the_installed_package_registers_the_method(installed):
    (ep,) = [ep for ep in importlib.metadata.entry_points(group=plugins.GROUP) if ep.name == PLUGIN]
    assert ep.dist.name == "spacenet-np-testplugin"
    cls = METHODS[PLUGIN]
    assert cls.__module__ == "spacenet_np_testplugin" and issubclass(cls, FineTune)
    assert PLUGIN not in METHODS.refused
    help_text = train.build_parser().format_help()
    assert PLUGIN in help_text and "--decay" in help_text


def test_import_does_not_load_plugins_and_a_fresh_process_finds_it(plugin_site):
    code = ("import sys, spacenet_np\n"
            "assert 'spacenet_np_testplugin' not in sys.modules, 'plugins load at import'\n"
            "from spacenet_np.methods import METHODS\n"
            f"print(METHODS[{PLUGIN!r}].__module__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "spacenet_np_testplugin"


def test_cli_trains_the_plugin_and_resumes_from_its_checkpoint(installed, npz_task, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--task", npz_task] + ARGS
    assert train.main(args + ["--out", str(full)]) == 0
    results = results_without_time(full)
    assert results["method"] == PLUGIN and results["spec"]["method_options"] == {"total_tasks": None, "decay": 0.25}

    resume_batches = interrupt_after(monkeypatch, tasks=1)  # in task 2
    assert train.main(args + ["--out", str(cut)]) == 130
    ckpt = cut / "checkpoints" / "seed0.ckpt"
    learner = checkpoint.restore_learner(ckpt, METHODS)
    assert type(learner) is METHODS[PLUGIN] and learner.tasks_learned == 1 and learner.decay == 0.25
    assert learner.total_tasks == 2 and learner.class_counts.tolist() == [30, 30, 0, 0]
    resume_batches()
    assert train.main(["--resume", str(cut)]) == 0
    assert results_without_time(cut) == results


def test_the_sweep_searches_the_plugin_option(installed, npz_task):
    assert "decay" in sweep.known_names(PLUGIN)
    plan = sweep.make_plan(npz_task, PLUGIN, searches=["decay=uniform:0.1:0.9"], trials=2, validation=0.2)
    assert plan.base["method"] == PLUGIN and len(plan.values) == 2


def test_the_estimator_takes_the_plugin(installed):
    from spacenet_np import SpaceNetClassifier
    x, y = make_blobs(4, 16, 20, seed=0)
    clf = SpaceNetClassifier(method=PLUGIN, hidden=(20,), connections_per_task=(40, 30), epochs=2, batch_size=16,
                             method_options={"decay": 0.5}, random_state=0)
    clf.partial_fit(x[y < 2], y[y < 2], classes=[0, 1, 2, 3]).partial_fit(x[y >= 2], y[y >= 2])
    assert clf.learner_.decay == 0.5 and clf.learner_.total_tasks == 2 and set(clf.predict(x)) <= {0, 1, 2, 3}


# ----- plugins that cannot be used: real EntryPoint objects, each naming what it loads -----
class Broken(FineTune):
    name = "wrong_name"


class ClashesWithConfig(FineTune):
    name = "clash_config"
    OPTIONS = (Option("lr", float, 0.1, "a second learning rate"),)


class ClashesWithMethod(FineTune):
    name = "clash_method"
    OPTIONS = (Option("ewc_lambda", int, 3, "not EWC's declaration"),)


class BadDefault(FineTune):
    name = "bad_default"
    OPTIONS = (Option("strength", float, -1.0, "must be >= 0", low=0.0),)


class SharesDeclaration(FineTune):
    name = "shares_declaration"
    OPTIONS = FineTune.OPTIONS


def entry_point(name, attribute):
    return importlib.metadata.EntryPoint(name=name, value=f"{__name__}:{attribute}", group=plugins.GROUP)


@pytest.mark.parametrize("name, value, reason", [
    ("no_module", "no_such_module_xyz:Method", "import failed: ModuleNotFoundError"),
    ("spacenet", f"{__name__}:SharesDeclaration", "method 'spacenet' exists already"),
    ("not_a_learner", f"{__name__}:entry_point", "is not a subclass of spacenet_np.strategy.Learner"),
    ("broken", f"{__name__}:Broken", "Broken.name is 'wrong_name'; it must be the entry point's name 'broken'"),
    ("clash_config", f"{__name__}:ClashesWithConfig", "option 'lr' (--lr) clashes with the config field 'lr'"),
    ("clash_method", f"{__name__}:ClashesWithMethod", "clashes with the option 'ewc_lambda' (--ewc-lambda) of "
                                                      "method 'ewc', declared differently"),
    ("bad_default", f"{__name__}:BadDefault", "option 'strength' has an invalid default: strength=-1.0 must be"),
    ("bad-name", f"{__name__}:SharesDeclaration", "the name must be letters, digits and _"),
])
def test_an_unusable_plugin_is_left_out_with_a_warning_naming_it(name, value, reason):
    ep = importlib.metadata.EntryPoint(name=name, value=value, group=plugins.GROUP)
    with pytest.warns(plugins.PluginWarning) as record:
        accepted, refused = plugins.discover(dict(METHODS), [ep])
    assert accepted == {} and reason in refused[name]
    assert len(record) == 1 and f"{name} = {value}" in str(record[0].message)


def test_a_shared_declaration_is_accepted_and_a_duplicate_name_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accepted, refused = plugins.discover(dict(METHODS), [entry_point("shares_declaration", "SharesDeclaration")])
    assert accepted == {"shares_declaration": SharesDeclaration} and refused == {}
    twice = [entry_point("shares_declaration", "SharesDeclaration"), entry_point("shares_declaration", "Broken")]
    with pytest.warns(plugins.PluginWarning, match="another plugin registers the same name"):
        accepted, refused = plugins.discover(dict(METHODS), twice)
    assert accepted == {} and set(refused) == {"shares_declaration"}


def test_reserved_names_cover_every_cli_argument():
    parser = train.build_parser()
    declared = {o.name for o in train.experiment.CONFIG_OPTIONS.values()} | train.method_option_names()
    cli = {action.dest for action in parser._actions} - declared
    assert cli <= plugins.RESERVED_NAMES


def test_the_example_plugin_is_a_valid_method_that_trains(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from spacenet_l2 import L2FineTune
    assert plugins.check_method("l2_finetune", L2FineTune, dict(METHODS)) is L2FineTune
    images, labels = make_blobs(4, 16, 10, seed=0)
    config = tiny_config(connections_per_task=(40, 20))
    decayed = L2FineTune(SparseMLP(16, [40], 4), config, seed=0, total_tasks=2, weight_decay=0.5)
    plain = FineTune(SparseMLP(16, [40], 4), config, seed=0, total_tasks=2)
    for learner in (decayed, plain):
        learner.learn(images[labels < 2], labels[labels < 2], [0, 1])
    norms = [np.linalg.norm(learner.model.layers[0].weights) for learner in (decayed, plain)]
    assert norms[0] < norms[1]  # the same start and batches: the decay shrinks the weights
