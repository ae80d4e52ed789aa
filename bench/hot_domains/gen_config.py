import sys
n=int(sys.argv[1]); backends=int(sys.argv[2]); origin=sys.argv[3]; out=sys.argv[4]
with open(out,"w") as f:
    f.write(f'''[proxy]
listen_addr = "127.0.0.1:19443"
listen_addr_http = "127.0.0.1:19080"
management_api_addr = "127.0.0.1:19081"
threads = 1

[api]
token = "t0ken-for-profiling-only"

[logging]
level = "warn"

[cluster]
node_id = 1
data_dir = "/tmp/prof/data-{n}-{backends}"
rpc_addr = "127.0.0.1:19090"
gossip_addr = "127.0.0.1:19091"
bootstrap_expect = 1
secret = "profiling-secret-profiling-secret"

[health_check]
interval_secs = 3600
timeout_secs = 2
path = "/"

''')
    for i in range(n):
        f.write(f'[[virtual_hosts]]\ndomain = "h{i}.bench"\nenabled_backends_tag = "t{i % backends}"\n\n')
    for i in range(backends):
        f.write(f'[[backends]]\nid = "b{i}"\naddress = "{origin}"\ntags = ["t{i}"]\n\n')
