"""A request as the caller sends it: the schema with its rules, and the input images it carries."""
