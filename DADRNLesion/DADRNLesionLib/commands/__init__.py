"""One module per `dadrn-lesion` subcommand; each exposes ``add_parser(subparsers)`` and ``run(args)``."""
