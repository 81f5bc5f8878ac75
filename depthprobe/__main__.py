"""`python -m depthprobe ...` (also what `torchrun -m depthprobe train ...` runs)."""

from depthprobe.cli import main

if __name__ == "__main__":
    main()
