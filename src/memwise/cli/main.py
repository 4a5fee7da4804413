"""The `memwise` command group."""

import click

from memwise.cli.demo import demo
from memwise.cli.estimate import devices_command, estimate_command
from memwise.cli.profile import profile_command
from memwise.cli.report import report_command
from memwise.cli.train import train_command
from memwise.cli.workloads import workloads_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memwise")
def main() -> None:
    """memwise: make PyTorch training and inference fit the memory you have.

    \b
    Example:
      memwise profile digits-cnn --batch-size 64 --verify
    """


main.add_command(profile_command)
main.add_command(workloads_command)
main.add_command(estimate_command)
main.add_command(devices_command)
main.add_command(train_command)
main.add_command(report_command)
main.add_command(demo)


if __name__ == "__main__":
    main()
