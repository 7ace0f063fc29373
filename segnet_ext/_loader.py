"""Loads the native library, or says exactly what failed and how to rebuild it."""
import importlib
import os

REBUILD = (
    "Rebuild it from the source tree with `pip install --no-build-isolation -e .` "
    "(needs the torch you run with, a C++ compiler and ninja; SEGNET_EXT_CUDA=0 skips the CUDA kernels)."
)


def load_native_library():
    import torch  # noqa: F401  (the native library links against torch's libraries)

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
