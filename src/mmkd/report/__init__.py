"""Reports: tables and plots rendered from the JSON metrics a run writes."""
