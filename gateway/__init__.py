"""L402 micropayment gateway: Lightning-priced HTTP resources backed by LND."""
