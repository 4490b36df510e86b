"""The ``maxmin-inspect`` command: the trainer's commands and the service's, wired together.

The only package that imports both ``training`` and ``app``; neither imports the other.
"""
