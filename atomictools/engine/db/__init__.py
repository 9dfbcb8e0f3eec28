"""SQLite: savepoint-scoped work, the statement guard, error translation, the database catalog."""
