"""Running driver code without Windows: the kernel loader's mapping, and unicorn-based execution."""
