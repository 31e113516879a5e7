"""Methods: one file each. A method turns the FP teacher into the student that gets sampled."""

from lowbit.methods.base import Method, MethodContext, build_method

__all__ = ["Method", "MethodContext", "build_method"]
