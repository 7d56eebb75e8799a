"""How much may queue in front of a small frame on the tunnel? (relay/mux.py)

Question: a bulk stream with a 4 MiB window can put megabytes into the tunnel transport in one
flush (``data_to_send()`` with no limit), and the kernel takes as much as its send buffer allows;
a 100-byte response of another stream then waits behind all of it. Three knobs, tried together
and apart with the end-to-end bench (``python -m bench.e2e --only
head_of_line,head_of_line_paced,single_download,bulk_download --repeat 1 --duration 3``; one run
each on the shared 2-core box, so differences under ~30 % are noise):

* ``TUNNEL_HIGH_WATER`` of the tunnel transport: 1 MiB (low 256 KiB) vs 256 KiB (low 64 KiB);
* a per-flush DATA budget of (high-water - buffered + one frame), so the rest of a burst waits in
  the session, where streams take turns, instead of in the transport;
* ``TCP_NOTSENT_LOWAT`` = 128 KiB on the tunnel socket: the kernel accepts data only while less
  than that is unsent, without limiting data in flight (the bandwidth-delay product).

    variant (high-water, budget, lowat)    HOL x full  HOL x paced  1 MiB GETs  one stream
    1 MiB, none (full run A, 3 x 5 s)           3.62        12.0     891 MiB/s   699 MiB/s
    256 KiB only (3 x 3 s)                      2.12           -             -           -
    1 MiB only (3 x 3 s)                        2.18           -             -           -
    1 MiB + budget + lowat (1 x 3 s)            2.32         8.3     891 MiB/s   991 MiB/s
    256 KiB + budget + lowat (1 x 3 s)          2.40        10.1     973 MiB/s   938 MiB/s

Verdict: keep 256 KiB + budget + lowat. It bounds the queue in front of an interactive frame by
construction (~450 KiB on the sending side instead of a window's worth plus the kernel buffer)
at no measured cost to bulk throughput. The head-of-line ratios did not move beyond noise: with
the queue bounded, the remaining delay is the receiving side working through a window-sized
burst of the bulk stream (up to 4 MiB per WINDOW_UPDATE), which these knobs do not touch.
"""
