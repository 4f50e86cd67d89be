"""The weight loader Job (`omni-runtime fetch-weights`): what to fetch and how to judge it (plan), and the fetch."""
