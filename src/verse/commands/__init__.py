"""One module per `verse` subcommand: HELP, EXAMPLES, add_arguments(parser), run(args) -> int."""
