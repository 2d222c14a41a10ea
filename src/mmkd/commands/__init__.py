"""The ``mmkd`` subcommands, one module each: ``add_parser(subparsers)`` registers the command's options with
``set_defaults(func=run)``; ``run(args)`` turns them into a library call and prints the result.

Modules here hold argument handling only; what a command does lives in the library layers below. Heavy imports
(torch, models) stay inside ``run`` so that building the parser (``mmkd --help``) stays fast.
"""
