"""Training objectives as pure tensor functions: divergences, chunked head losses, policy-gradient parts."""
