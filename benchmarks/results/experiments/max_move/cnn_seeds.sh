# From the repository root: sh benchmarks/results/experiments/max_move/cnn_seeds.sh > cnn_seeds.txt
for s in 0 1 2 3 4; do
  for m in default 0; do
    if [ $m = default ]; then extra=""; else extra="--max-move 0"; fi
    echo "max_move=$m seed $s: $(python examples/cnn.py --optim kfac --num-train 3000 --num-epochs 3 --threads 1 --no-progress --seed $s $extra --out /tmp/cnns_${m}_$s 2>&1 | grep 'epoch   3')"
  done
done
