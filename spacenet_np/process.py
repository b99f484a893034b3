"""How the command-line modules run as a process (``python -m spacenet_np.train``, ``sweep``, ``report``)."""
import gc
import sys


def run_main(main):
    """Run ``main()`` as this process's entry point and exit with the code it returns.

    The objects made before ``main`` runs and those left when it returns (NumPy's, SciPy's and Numba's types and
    registries, about a million) are moved out of the garbage collector's reach (``gc.freeze``): they live until
    the process ends, and scanning them cost about 0.06 s in Numba's first kernel load and 0.25 s in the
    interpreter's exit (a split MNIST seed's process: 2.0 -> 1.7 s). Objects made while ``main`` runs are
    collected as usual.
    """
    gc.freeze()
    code = main()
    gc.freeze()
    sys.exit(code)
