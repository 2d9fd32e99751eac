// The node agent's BPF programs. They use only tracepoint formats, __sk_buff and helpers, never kernel
// struct layouts, so one build works across kernels (the headers BCC compiles against need not match).
//
// Maps are keyed by the tool call's v2 cgroup id and pinned under PIN_DIR (set by the loader), so that a
// restarted node agent picks up the calls that were running, their policies and their counters.

// MODE_*, MAX_* and IPPROTO_*_ come from the loader (bpf.py), which takes them from egress.py: one source.
// What each mode admits is explained there too.

#define EVENT_EXEC 1
#define EVENT_EXIT 2
#define EVENT_OOM 3
#define EVENT_BLOCKED 4


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
    u64 dns_refused;   // DNS queries to the node agent dropped here (a `none` call); the agent adds its own
};

// LPM trie key: the family byte then the address; prefixlen counts the family byte (see egress.lpm_key).
struct lpm_key {
    u32 prefixlen;
    u8 data[20];
};

// The node agent's DNS answering: where it listens (family 0: not answering).
struct settings {
    u32 dns_addr[4];
    u16 dns_port;
    u8 dns_family;
    u8 pad;
};

// Who sent a DNS query to the node agent: the DNS answering looks its call up by the query's source.
struct sender_key {
    u32 addr[4];
    u16 port;
    u8 family;
    u8 proto;
};

// An address a call resolved through an allowed name, for one port (0: any), until `value` (ktime ns).
struct resolved_key {
    u64 cgroup_id;
    u32 addr[4];
    u16 port;
    u8 family;
    u8 pad[5];
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
BPF_TABLE_PINNED("hash", struct resolved_key, u64, resolved, MAX_RESOLVED, PIN_DIR "/resolved");
// A sandbox's own cgroups (the sandbox's and its main leaf's ids) → the sandbox's: the only cgroups under a
// sandbox whose sockets send without a call's policy.
BPF_TABLE_PINNED("hash", u64, u64, sandbox_cgroups, MAX_SANDBOX_CGROUPS, PIN_DIR "/sandbox_cgroups");
BPF_LPM_TRIE(cluster_nets, struct lpm_key, u8, MAX_CLUSTER_NETWORKS);
BPF_LPM_TRIE(public_refused, struct lpm_key, u8, 64);
BPF_LPM_TRIE(node_addrs, struct lpm_key, u8, MAX_NODE_ADDRESSES);
BPF_ARRAY(settings, struct settings, 1);
BPF_TABLE("lru_hash", struct sender_key, u64, dns_senders, MAX_DNS_SENDERS);
// Sockets whose blocked connection attempt was counted already: a TCP connect retransmits its SYN
// (1 s, 3 s, ...), and one connect is one blocked connection.
BPF_SK_STORAGE(counted, u8);
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
    // No wake-up: the agent reads a call's events itself when the call finishes (and a reader thread
    // sweeps the rest now and then), instead of being woken twice per call for its exec and exit.
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
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

static __always_inline void lpm_key_of(struct lpm_key *key, u8 family, u32 *daddr) {
    key->prefixlen = family == 4 ? 8 + 32 : 8 + 128;
    key->data[0] = family;
    __builtin_memcpy(&key->data[1], daddr, 16);
}

// BCC binds a map to its name at each call site (not through a pointer or a macro): one function per trie.
static __always_inline int in_cluster(u8 family, u32 *daddr) {
    struct lpm_key key = {};
    lpm_key_of(&key, family, daddr);
    return cluster_nets.lookup(&key) != NULL;
}

static __always_inline int of_node(u8 family, u32 *daddr) {
    struct lpm_key key = {};
    lpm_key_of(&key, family, daddr);
    return node_addrs.lookup(&key) != NULL;
}

static __always_inline int not_public(u8 family, u32 *daddr) {
    struct lpm_key key = {};
    lpm_key_of(&key, family, daddr);
    return public_refused.lookup(&key) != NULL;
}

static __always_inline int resolved_allows(u64 id, u8 family, u32 *daddr, u16 port, int attempt) {
    struct resolved_key key = {};
    key.cgroup_id = id;
    __builtin_memcpy(key.addr, daddr, 16);
    key.port = port;
    key.family = family;
    u64 *expires = resolved.lookup(&key);
    if (!expires)
        return 0;
    // Past its TTL an address takes no new connection; the packets of one opened in time keep flowing.
    return !attempt || bpf_ktime_get_ns() < *expires;
}

static __always_inline void count_blocked(struct __sk_buff *skb, u64 id, u32 *daddr, u16 dport, u8 family,
                                          int attempt, u8 proto) {
    struct call_stats *s = tracked(id);
    if (!s)
        return;
    __sync_fetch_and_add(&s->blocked_packets, 1);
    if (!attempt)
        return;
    if (proto == IPPROTO_TCP_) {
        struct bpf_sock *sk = skb->sk;
        if (sk)
            sk = bpf_sk_fullsock(sk);
        if (sk) {
            u8 *seen = counted.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
            if (seen) {
                if (*seen)
                    return;  // a retransmitted SYN of a connect already counted
                *seen = 1;
            }
        }
    }
    __sync_fetch_and_add(&s->blocked_connections, 1);
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (e) {
        __builtin_memset(e, 0, sizeof(*e));
        e->cgroup_id = id;
        e->timestamp_ns = bpf_ktime_get_ns();
        e->kind = EVENT_BLOCKED;
        __builtin_memcpy(e->daddr, daddr, 16);
        e->dport = dport;
        e->family = family;
        events.ringbuf_submit(e, 0);
    }
}

// cgroup_skb programs see the packet from its network header on. A socket keeps the cgroup it was made in,
// so a packet without a call's policy is either the sandbox's own (its runtime, in the main leaf: it passes)
// or from a socket a call made and handed on before it ended (its cgroup kept empty for a later call, or
// gone): that one is dropped, whoever holds it now.
int egress(struct __sk_buff *skb) {
    u64 id = bpf_skb_cgroup_id(skb);
    struct policy *p = policies.lookup(&id);
    if (!p)
        return sandbox_cgroups.lookup(&id) != NULL;

    u8 first = 0;
    if (bpf_skb_load_bytes(skb, 0, &first, 1) < 0)
        return 0;
    u8 family = first >> 4;
    u32 daddr[4] = {0, 0, 0, 0};
    u32 saddr[4] = {0, 0, 0, 0};
    u8 proto = 0;
    u32 transport = 0;
    int first_fragment = 1;
    if (family == 4) {
        u16 frag = 0;
        bpf_skb_load_bytes(skb, 6, &frag, 2);
        first_fragment = (bpf_ntohs(frag) & 0x1fff) == 0;
        bpf_skb_load_bytes(skb, 9, &proto, 1);
        bpf_skb_load_bytes(skb, 12, &saddr[0], 4);
        bpf_skb_load_bytes(skb, 16, &daddr[0], 4);
        transport = (first & 0x0f) * 4;
    } else if (family == 6) {
        // Next header only: behind an extension header (a fragment, options) the ports read as 0, which
        // only an any-port rule admits (fail closed).
        bpf_skb_load_bytes(skb, 6, &proto, 1);
        bpf_skb_load_bytes(skb, 8, &saddr, 16);
        bpf_skb_load_bytes(skb, 24, &daddr, 16);
        transport = 40;
    } else {
        return 0;
    }
    u16 sport = 0, dport = 0;
    u8 tcp_flags = 0;
    int l4 = proto == IPPROTO_TCP_ || proto == IPPROTO_UDP_;
    if (l4 && first_fragment) {
        u16 raw[2] = {0, 0};
        bpf_skb_load_bytes(skb, transport, &raw, 4);
        sport = bpf_ntohs(raw[0]);
        dport = bpf_ntohs(raw[1]);
        if (proto == IPPROTO_TCP_)
            bpf_skb_load_bytes(skb, transport + 13, &tcp_flags, 1);
    }
    // A connection attempt: a TCP SYN without ACK, or any UDP datagram (there is no handshake).
    int attempt = proto == IPPROTO_UDP_ || (proto == IPPROTO_TCP_ && (tcp_flags & 0x12) == 0x02);

    // 1. The pod's own loopback never leaves the pod.
    u8 *bytes = (u8 *)daddr;
    if (family == 4 ? bytes[0] == 127
                    : (daddr[0] == 0 && daddr[1] == 0 && daddr[2] == 0 && daddr[3] == bpf_htonl(1)))
        return 1;

    // 2. DNS to the node agent's answering: refused for `none`, else let through with its sender recorded.
    int zero = 0;
    struct settings *cfg = settings.lookup(&zero);
    if (cfg && cfg->dns_family == family && l4 && dport == cfg->dns_port && daddr[0] == cfg->dns_addr[0]
        && daddr[1] == cfg->dns_addr[1] && daddr[2] == cfg->dns_addr[2] && daddr[3] == cfg->dns_addr[3]) {
        if (p->mode == MODE_NONE) {
            struct call_stats *s = tracked(id);
            if (s && attempt)
                __sync_fetch_and_add(&s->dns_refused, 1);
            return 0;
        }
        struct sender_key sender = {};
        __builtin_memcpy(sender.addr, saddr, 16);
        sender.port = sport;
        sender.family = family;
        sender.proto = proto;
        dns_senders.update(&sender, &id);
        return 1;
    }

    int allowed = 0;
    if (p->mode == MODE_EXPLICIT) {
        u32 n = p->nrules;
        #pragma unroll
        for (int i = 0; i < MAX_RULES; i++) {
            if (i < n && rule_matches(&p->rules[i], family, daddr, dport)) {
                allowed = 1;
                break;
            }
        }
        // An address resolved for an allowed name, unless it is one of the node's own (a zone may point anywhere).
        if (!allowed)
            allowed = (resolved_allows(id, family, daddr, dport, attempt) || resolved_allows(id, family, daddr, 0, attempt))
                      && !of_node( family, daddr);
    } else if (p->mode == MODE_CLUSTER) {
        allowed = in_cluster( family, daddr) && !of_node( family, daddr);
    } else if (p->mode == MODE_INTERNET) {
        allowed = !not_public( family, daddr) && !of_node( family, daddr);
    }
    if (allowed)
        return 1;
    count_blocked(skb, id, daddr, dport, family, attempt, proto);
    return 0;
}
