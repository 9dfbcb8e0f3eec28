"""Every file change, one pipeline: resolve -> check -> stage -> commit -> finish.

``model`` says what a change is; ``checks`` holds every precondition and its one message;
``direct`` commits a single change by one rename; ``journaled`` commits through an intent
record (a change set, or any change with an idempotency key); ``record`` is that record's
typed, versioned form; ``recovery`` and ``sweep`` finish or undo what a crash interrupted.
"""
