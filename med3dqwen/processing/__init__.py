"""Volume I/O and CT transforms: load, window, resize, draw boundary prompts."""
