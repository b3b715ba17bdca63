"""The six boxes of the blueprint, one file each. They depend on ami.messages and torch only."""
