"""`python -m finetune <command>`: see finetune/cli.py."""

from finetune.cli import main
from finetune.command import exit_now

exit_now(main())
