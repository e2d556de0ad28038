"""Stage one, `cache-teacher`: dataset -> tokens -> teacher engine -> sparse targets -> `storage`."""
