"""Ray orchestration and the user-facing surface (issue 5)."""
