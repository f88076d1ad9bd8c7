"""``python scripts/convert_hf.py ...``: the same as the ``wsjax-convert`` command
(wsjax.interop.convert), kept for the command lines that name the script."""

from wsjax.interop.convert import cli

if __name__ == "__main__":
    cli()
