"""The renderers of the results blocks in README.md and docs/*.md (``make readme``, ``tools/readme.py``).

A repository tool, not part of the installed package: importing this package registers every section.
"""

from readme_sections import families, matching, recipes, reinforce, render  # noqa: F401  (each registers its sections)
from readme_sections.core import SECTIONS, ReadmeError, ResultsMissing, update_pages, update_readme

__all__ = ["SECTIONS", "ReadmeError", "ResultsMissing", "update_pages", "update_readme"]
