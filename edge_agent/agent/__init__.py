"""The agent: its validated configuration and the service loop that runs the stages
(capture -> batch -> infer -> score -> decide -> publish)."""
