"""The command lines (train, generate, evaluate, convert, aot) and their shared flags; nothing else imports them."""
