"""`python -m finetune <command>`: see finetune/cli.py."""

from finetune.cli import main
from finetune.core.command import exit_now

exit_now(main())
