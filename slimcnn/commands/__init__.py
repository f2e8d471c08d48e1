"""Subcommands of the ``slimcnn`` CLI, one file each."""
