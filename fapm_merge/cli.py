"""The `fapm-merge` command."""
import click


@click.group()
def main():
    """fapm-merge: FAPM for mergekit."""
