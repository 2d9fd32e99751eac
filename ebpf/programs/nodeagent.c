// The node agent's BPF programs. They use only tracepoint formats, __sk_buff and helpers, never kernel
// struct layouts, so one build works across kernels (the headers BCC compiles against need not match).
//
// Maps are keyed by the tool call's v2 cgroup id and pinned under PIN_DIR (set by the loader), so that a
// restarted node agent picks up the calls that were running, their policies and their counters.

#define MODE_NONE 1
#define MODE_LOOPBACK 2
#define MODE_ALLOWLIST 3

#define EVENT_EXEC 1
#define EVENT_EXIT 2
#define EVENT_OOM 3
#define EVENT_BLOCKED 4

#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17

struct rule {
    u32 addr[4];   // network byte order, as the packet carries it
    u32 mask[4];
    u16 port;      // host order; 0 = any port
    u8 family;     // 4 or 6
    u8 pad;
};

struct policy {
    u32 mode;
    u32 nrules;
    struct rule rules[MAX_RULES];
};

struct call_stats {
    u64 forks;
    u64 execs;
    u64 exits;
    u64 ooms;
    u64 blocked_packets;
    u64 blocked_connections;
};

struct event {
    u64 cgroup_id;
    u64 timestamp_ns;
    u32 kind;
    u32 pid;
    u32 daddr[4];
    u16 dport;
    u8 family;
    u8 pad;
    char comm[16];
};

BPF_TABLE_PINNED("hash", u64, struct policy, policies, MAX_CALLS, PIN_DIR "/policies");
BPF_TABLE_PINNED("hash", u64, struct call_stats, call_stats, MAX_CALLS, PIN_DIR "/call_stats");
BPF_RINGBUF_OUTPUT(events, 64);

static __always_inline struct call_stats *tracked(u64 cgroup_id) {
    return call_stats.lookup(&cgroup_id);
}

static __always_inline void emit(u64 cgroup_id, u32 kind, u32 pid) {
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e)
        return;
    __builtin_memset(e, 0, sizeof(*e));
    e->cgroup_id = cgroup_id;
    e->timestamp_ns = bpf_ktime_get_ns();
    e->kind = kind;
    e->pid = pid;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    struct call_stats *s = tracked(bpf_get_current_cgroup_id());
    if (s)
        __sync_fetch_and_add(&s->forks, 1);
    return 0;
}

// Count an exec, exit or OOM kill for the call whose cgroup the current task is in, and report it.
static __always_inline int on_call_event(u32 kind, u32 pid) {
    u64 id = bpf_get_current_cgroup_id();
    struct call_stats *s = tracked(id);
    if (!s)
        return 0;
    if (kind == EVENT_EXEC)
        __sync_fetch_and_add(&s->execs, 1);
    else if (kind == EVENT_EXIT)
        __sync_fetch_and_add(&s->exits, 1);
    else
        __sync_fetch_and_add(&s->ooms, 1);
    emit(id, kind, pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    return on_call_event(EVENT_EXEC, args->pid);
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    return on_call_event(EVENT_EXIT, args->pid);
}

// A memcg OOM kill runs in the context of the task whose charge failed, which is in the call's cgroup.
TRACEPOINT_PROBE(oom, mark_victim) {
    return on_call_event(EVENT_OOM, args->pid);
}

static __always_inline int rule_matches(struct rule *r, u8 family, u32 *daddr, u16 dport) {
    if (r->family != family)
        return 0;
    if (r->port && r->port != dport)
        return 0;
    #pragma unroll
    for (int i = 0; i < 4; i++)
        if ((daddr[i] & r->mask[i]) != r->addr[i])
            return 0;
    return 1;
}

// cgroup_skb programs see the packet from its network header on.
int egress(struct __sk_buff *skb) {
    u64 id = bpf_skb_cgroup_id(skb);
    struct policy *p = policies.lookup(&id);
    if (!p)
        return 1;

    u8 first = 0;
    if (bpf_skb_load_bytes(skb, 0, &first, 1) < 0)
        return 1;
    u8 family = first >> 4;
    u32 daddr[4] = {0, 0, 0, 0};
    u8 proto = 0;
    u32 transport = 0;
    if (family == 4) {
        bpf_skb_load_bytes(skb, 9, &proto, 1);
        bpf_skb_load_bytes(skb, 16, &daddr[0], 4);
        transport = (first & 0x0f) * 4;
    } else if (family == 6) {
        bpf_skb_load_bytes(skb, 6, &proto, 1);
        bpf_skb_load_bytes(skb, 24, &daddr, 16);
        transport = 40;
    } else {
        return 1;
    }
    u16 dport = 0;
    u8 tcp_flags = 0;
    if (proto == IPPROTO_TCP_ || proto == IPPROTO_UDP_) {
        u16 raw = 0;
        bpf_skb_load_bytes(skb, transport + 2, &raw, 2);
        dport = bpf_ntohs(raw);
        if (proto == IPPROTO_TCP_)
            bpf_skb_load_bytes(skb, transport + 13, &tcp_flags, 1);
    }

    int allowed = 0;
    if (p->mode == MODE_LOOPBACK) {
        u8 *bytes = (u8 *)daddr;
        allowed = family == 4 ? bytes[0] == 127
                              : (daddr[0] == 0 && daddr[1] == 0 && daddr[2] == 0 && daddr[3] == bpf_htonl(1));
    } else if (p->mode == MODE_ALLOWLIST) {
        u32 n = p->nrules;
        #pragma unroll
        for (int i = 0; i < MAX_RULES; i++) {
            if (i < n && rule_matches(&p->rules[i], family, daddr, dport)) {
                allowed = 1;
                break;
            }
        }
    }
    if (allowed)
        return 1;

    struct call_stats *s = tracked(id);
    if (s) {
        __sync_fetch_and_add(&s->blocked_packets, 1);
        // A connection attempt: a TCP SYN without ACK, or any UDP datagram (there is no handshake).
        int attempt = proto == IPPROTO_UDP_ || (proto == IPPROTO_TCP_ && (tcp_flags & 0x12) == 0x02);
        if (attempt) {
            __sync_fetch_and_add(&s->blocked_connections, 1);
            struct event *e = events.ringbuf_reserve(sizeof(struct event));
            if (e) {
                __builtin_memset(e, 0, sizeof(*e));
                e->cgroup_id = id;
                e->timestamp_ns = bpf_ktime_get_ns();
                e->kind = EVENT_BLOCKED;
                __builtin_memcpy(e->daddr, daddr, sizeof(daddr));
                e->dport = dport;
                e->family = family;
                events.ringbuf_submit(e, 0);
            }
        }
    }
    return 0;
}
