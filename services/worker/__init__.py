"""The model worker: hosts causal LMs, keeps a KV cache per (session, model), steps many
sessions in one batched forward, drafts, rolls back, releases. It knows nothing of EFT."""
