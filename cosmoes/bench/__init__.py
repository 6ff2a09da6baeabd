"""The on-device benchmark (§3.4.3, Table 4): the harness, the devices it runs on (local, adb) and the eager baseline."""
