"""vitaudit service: the HTTP edge. It never imports torch."""
