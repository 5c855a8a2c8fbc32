"""The loader protocol: typed, versioned messages (`messages`), their channel (`wire`), the
job a loader runs and the manifest it answers with (`held`)."""
