"""Rendering (pure): a validated spec and its sizing -> every child object (plan.make_plan)."""
