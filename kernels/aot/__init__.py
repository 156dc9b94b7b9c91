"""Static GPU-quality checks without a GPU: ahead-of-time compiles (compile.py) and ptxas reports (ptxas.py)."""
