import time, torch
torch.set_num_threads(1)
def t(f, n=7):
    f(); s = time.perf_counter()
    for _ in range(n): f()
    return round(1e3 * (time.perf_counter() - s) / n, 2)
for n in (251, 501, 785, 1001):
    x = torch.randn(n, 2 * n); A = x @ x.T / (2 * n) + 1e-2 * torch.eye(n)
    S = torch.randn(n, n); S = S + S.T
    C = torch.linalg.cholesky(A)
    Ct = C.mT.contiguous()
    st = torch.linalg.solve_triangular
    r = {
        "L left": t(lambda: st(C, S, upper=False)),
        "Lt left (view)": t(lambda: st(C.mT, S, upper=True)),
        "Ct left (contig)": t(lambda: st(Ct, S, upper=True)),
        "Lt right (view)": t(lambda: st(C.mT, S, upper=True, left=False)),
        "L right": t(lambda: st(C, S, upper=False, left=False)),
        "Ct right (contig)": t(lambda: st(Ct, S, upper=True, left=False)),
    }
    print(n, r)
