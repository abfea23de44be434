"""The soak: thousands of clients come and go while publishes go on; nothing may leak and nothing may be lost."""
