"""DVC stages: one thin module per stage (read params, call pipeline/, write outputs)."""
