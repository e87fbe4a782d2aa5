project = "tentacle"
author = "the tentacle developers"
extensions: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
