"""Built-in stages, one class per file; registered by import string in ``alignment.registry``."""
