"""python3 -m levattn info: the build, the kernels in use, numpy and torch versions."""
import sys

from . import info


def main(argv):
    if argv[1:] != ["info"]:
        print("usage: python3 -m levattn info", file=sys.stderr)
        return 2
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
