"""Settlement in the web app: each captured charging payment allocated among the parties of its site (payments.settlement)."""
