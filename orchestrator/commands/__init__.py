"""One module per `orchestrate` sub-command. Each defines NAME, HELP, add_arguments(parser), run(args) -> int."""
