"""Data: prompt templates and training sets (data), GLUE tasks (glue), and the built-in offline models and data
(builtin)."""
