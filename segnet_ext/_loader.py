"""Loads the native library, or says exactly what failed and how to rebuild it."""
import importlib
import os

REBUILD = (
    "Rebuild it from the source tree with `pip install --no-build-isolation -e .` "
    "(needs the torch you run with, a C++ compiler and ninja; SEGNET_EXT_CUDA=0 skips the CUDA kernels)."
)


def load_native_library():
    """segnet_ext._C, or the library file that $SEGNET_EXT_LIBRARY names (a sanitizer
    build of the same sources, say: see setup.py), loaded in its place."""
    import torch  # noqa: F401  (the native library links against torch's libraries)

    path = os.environ.get("SEGNET_EXT_LIBRARY")
    if path:
        if not os.path.isfile(path):
            raise ImportError(f"segnet_ext: SEGNET_EXT_LIBRARY={path!r} is not a file")
        torch.ops.load_library(path)
        return None
    try:
        return importlib.import_module("segnet_ext._C")
    except ImportError as error:
        here = os.path.dirname(os.path.abspath(__file__))
        if "undefined symbol" in str(error):
            why = (f"segnet_ext._C in {here} was built against a different torch than the "
                   f"installed {torch.__version__} ({error}).")
        elif "No module named" in str(error):
            why = f"the native library segnet_ext._C was not built (nothing found in {here})."
        else:
            why = f"the native library segnet_ext._C failed to load: {error}."
        raise ImportError(f"segnet_ext: {why} {REBUILD}") from error
