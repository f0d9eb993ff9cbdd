"""Triton kernels of fastpeft, importable as fastpeft.kernels. Import Triton lazily through these modules."""
