-- The last minute's use of each limit, read from the calls by one replica for all of them
-- (issue: replicas that add up).
--
-- Every replica read the last minute of calls (`limit_usage`'s requests_last_minute and
-- tokens_last_minute) every 10 s for its gauge `sheepdog_limit_used_last_minute`: N replicas
-- read the same rows N times, and the rows are as many as the fleet makes calls in a minute
-- (eight replicas at 5,000 calls a second spent about 40 ms of the server's CPU each on it). Now a
-- replica whose gauge is due reads this row; when the row is 10 s old, the one replica that
-- locks it first reads the calls and writes it, and the others read it as it was. `limit_usage`
-- and `sheepdog limits show` still read the calls themselves.
CREATE TABLE sheepdog.last_minute_use (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    read_at timestamptz NOT NULL,
    scopes text[] NOT NULL,
    requests bigint[] NOT NULL,
    tokens numeric[] NOT NULL
);
INSERT INTO sheepdog.last_minute_use (read_at, scopes, requests, tokens)
VALUES ('-infinity', '{}', '{}', '{}');
