"""DynamICCL: learns which NCCL configuration is fastest on a fabric and applies it."""

__version__ = "0.1.0"
