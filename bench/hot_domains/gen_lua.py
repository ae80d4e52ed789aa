import sys
n=int(sys.argv[1]); out=sys.argv[2]
with open(out,"w") as f:
    f.write(f"reqs = {{}}\nn = {n}\n")
    f.write(f"for i = 1, n do reqs[i] = wrk.format(\"GET\", \"/\", {{[\"Host\"] = \"h\" .. (i - 1) .. \".bench\"}}) end\n")
    f.write("math.randomseed(42)\n")
    f.write("request = function()\n  return reqs[math.random(n)]\nend\n")
